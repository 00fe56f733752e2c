//! Connecting to the observer: over the unix socket (the `flows` and `alerts` commands on the node) or
//! over TCP with mutual TLS.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::observer::proto::observer_client::ObserverClient;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        source: tonic::transport::Error,
    },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid address {0}")]
    Address(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A client over the agent's unix socket.
pub async fn connect_unix(path: &Path) -> Result<ObserverClient<Channel>> {
    let path = path.to_owned();
    let target = path.display().to_string();
    // The URI is required by the API but unused: the connector below decides where to connect.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|source| Error::Connect { target, source })?;
    Ok(ObserverClient::new(channel).max_decoding_message_size(16 << 20))
}

/// PEM files of a TLS client: the CA that signed the server's certificate, and this client's
/// certificate and key.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to check in the server certificate (default: the host of the address).
    pub domain: Option<String>,
}

/// A client over TCP with mutual TLS; `addr` is `host:port` or `https://host:port`.
pub async fn connect_tls(addr: &str, tls: &ClientTls) -> Result<ObserverClient<Channel>> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| Error::Read {
            path: p.clone(),
            source,
        })
    };
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("https://{addr}")
    };
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(d) = &tls.domain {
        config = config.domain_name(d.clone());
    }
    let endpoint = Endpoint::from_shared(uri.clone()).map_err(|_| Error::Address(addr.to_owned()))?;
    let channel = endpoint
        .tls_config(config)
        .map_err(|source| Error::Connect {
            target: uri.clone(),
            source,
        })?
        .connect()
        .await
        .map_err(|source| Error::Connect { target: uri, source })?;
    Ok(ObserverClient::new(channel).max_decoding_message_size(16 << 20))
}
