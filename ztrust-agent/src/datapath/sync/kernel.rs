//! [`MapOps`] over the kernel maps, through the loader's wrappers.

use tracing::warn;
use ztrust_common::{
    EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey, ServiceValue,
};

use super::{Error, MapOps, Result};

/// [`MapOps`] over the kernel maps.
pub struct KernelMaps<'a>(pub &'a mut crate::datapath::loader::Maps);

fn werr(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Write { map, source }
}

fn ignore_missing(r: std::result::Result<(), aya::maps::MapError>, map: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => {
            warn!(map, error = %e, "delete failed");
            Err(Error::Write { map, source: e })
        }
    }
}

impl MapOps for KernelMaps<'_> {
    fn set_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<()> {
        self.0
            .endpoints
            .insert(ifindex, *info, 0)
            .map_err(werr("endpoints"))
    }
    fn del_endpoint(&mut self, ifindex: u32) -> Result<()> {
        ignore_missing(self.0.endpoints.remove(&ifindex), "endpoints")
    }
    fn set_ipcache(&mut self, prefix: u32, key: &IpcacheKey, value: &IpcacheValue) -> Result<()> {
        self.0.ipcache.insert(prefix, key, value).map_err(werr("ipcache"))
    }
    fn del_ipcache(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        ignore_missing(self.0.ipcache.remove(prefix, key), "ipcache")
    }
    fn set_policy(&mut self, prefix: u32, key: &PolicyKey, value: &PolicyValue) -> Result<()> {
        self.0.policy.insert(prefix, key, value).map_err(werr("policy"))
    }
    fn del_policy(&mut self, prefix: u32, key: &PolicyKey) -> Result<()> {
        ignore_missing(self.0.policy.remove(prefix, key), "policy")
    }
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.0.services.insert(key, value, 0).map_err(werr("services"))
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        ignore_missing(self.0.services.remove(key), "services")
    }
    fn set_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        self.0
            .service_ranges
            .insert(&aya::maps::lpm_trie::Key::new(prefix, *key), 0, 0)
            .map_err(werr("service ranges"))
    }
    fn del_service_range(&mut self, prefix: u32, key: &IpcacheKey) -> Result<()> {
        ignore_missing(
            self.0
                .service_ranges
                .remove(&aya::maps::lpm_trie::Key::new(prefix, *key)),
            "service ranges",
        )
    }
    fn bump_revision(&mut self) -> Result<()> {
        let current = self.0.revision.get(&0, 0).map_err(werr("revision"))?;
        self.0
            .revision
            .set(0, current.wrapping_add(1), 0)
            .map_err(werr("revision"))
    }
}
