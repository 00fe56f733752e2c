//! Endpoint state: which policies select each local endpoint, and its allow set patched from the
//! rules that apply to it.

use super::*;

impl Engine {
    /// Compiles what the changes made necessary: rules of policies that now select a local endpoint
    /// (dropping those that select none), rules whose peers changed, then the allow sets of the local
    /// endpoints that depend on any of it.
    pub(super) fn settle(&mut self) {
        for p in std::mem::take(&mut self.st.touched_policies) {
            let active = self.st.selected.get(&p).is_some_and(|s| !s.is_empty());
            if !active {
                self.st.selected.remove(&p);
                self.drop_rules(&p);
                continue;
            }
            let Some(policy) = self.st.policies.get(&p).cloned() else {
                continue;
            };
            let mut added = false;
            for (direction, index, _) in effective(&policy) {
                let key = (p.clone(), direction, index);
                if !self.st.compiled.contains_key(&key) {
                    self.build_rule(&policy, key);
                    added = true;
                }
            }
            if added {
                let eps = self.st.selected[&p].iter().cloned().collect::<Vec<_>>();
                self.st.dirty_endpoints.extend(eps);
            }
        }
        // Rules whose peers (or named-port identities) changed: all compiled again first, then the
        // endpoints that use them patched entry by entry (or recompiled whole when a patch cannot say).
        let mut rebuilt = Vec::new();
        for key in std::mem::take(&mut self.st.dirty_rules) {
            let Some(old) = self.st.compiled.remove(&key) else {
                continue;
            };
            let Some(policy) = self.st.policies.get(&key.0).cloned() else {
                continue;
            };
            self.build_rule(&policy, key.clone());
            if self.st.compiled.get(&key) != Some(&old) {
                rebuilt.push((key, old));
            }
        }
        for (key, old) in rebuilt {
            let eps: Vec<ObjectRef> = self
                .st
                .selected
                .get(&key.0)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            for ep in eps {
                if self.st.dirty_endpoints.contains(&ep) {
                    continue;
                }
                match self.patch_endpoint(&ep, &key, &old) {
                    Some(groups) if groups.is_empty() => {}
                    Some(groups) => self.delta.endpoint(&ep, Some(groups)),
                    None => {
                        self.st.dirty_endpoints.insert(ep);
                    }
                }
            }
        }
        for ep in std::mem::take(&mut self.st.dirty_endpoints) {
            let new = self.endpoint_policy(&ep);
            let old = match new {
                Some(new) => self.desired.endpoints.insert(ep.clone(), new),
                None => self.desired.endpoints.remove(&ep),
            };
            if old.as_ref() != self.desired.endpoints.get(&ep) {
                self.delta.endpoint(&ep, None);
            }
        }
        self.identities.finish();
        self.rules.finish();
        self.desired.warnings = self.warnings();
    }

    pub(super) fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for ip in &self.st.contested {
            let Some(claims) = self.st.claims.get(ip) else {
                continue;
            };
            let first = claims.first().expect("a claim");
            for pod in claims {
                if pod == first {
                    if self.st.host_addrs.contains(ip) {
                        out.push(format!(
                            "Pod {pod}: status.podIPs: address {ip} is an address of the node; traffic from it is treated as the node's"
                        ));
                    }
                } else {
                    out.push(format!(
                        "Pod {pod}: status.podIPs: address {ip} is also the address of Pod {first}; the ipcache maps it to {first}"
                    ));
                }
            }
        }
        out.extend(
            self.st
                .compiled
                .values()
                .flat_map(|cr| cr.warnings.iter().cloned()),
        );
        out
    }

    /// The allow set and isolation of local endpoint `ep`, from the compiled rules of the policies that
    /// select it (in policy, then rule order: the first rule that allows an entry names it).
    pub(super) fn endpoint_policy(&self, ep: &ObjectRef) -> Option<EndpointPolicy> {
        let local = self.st.locals.get(ep)?;
        let of = |direction: u8| -> Vec<&ObjectRef> {
            let audited_only = self.audited_only(local, direction);
            local
                .selected_by
                .iter()
                .filter(|p| self.decides(&self.st.policies[*p], direction, audited_only))
                .collect()
        };
        let (ingress_of, egress_of) = (of(dir::INGRESS), of(dir::EGRESS));
        let mut out = EndpointPolicy {
            identity: local.identity,
            ips: local.ips.clone(),
            isolated_ingress: !ingress_of.is_empty(),
            isolated_egress: !egress_of.is_empty(),
            audit_ingress: !ingress_of.is_empty() && self.audited_only(local, dir::INGRESS),
            audit_egress: !egress_of.is_empty() && self.audited_only(local, dir::EGRESS),
            ingress_policies: ingress_of.iter().map(|p| (*p).clone()).collect(),
            egress_policies: egress_of.iter().map(|p| (*p).clone()).collect(),
            allow: BTreeMap::new(),
        };
        for (direction, list) in [(dir::INGRESS, &ingress_of), (dir::EGRESS, &egress_of)] {
            for p in list {
                let policy = &self.st.policies[*p];
                let n = if direction == dir::INGRESS {
                    policy.ingress.len()
                } else {
                    policy.egress.len()
                };
                for ri in 0..n {
                    let Some(cr) = self.st.compiled.get(&((*p).clone(), direction, ri)) else {
                        debug_assert!(false, "rule {p} {direction} {ri} not compiled");
                        continue;
                    };
                    for k in &cr.keys {
                        out.allow.entry(*k).or_insert(cr.rule_id);
                    }
                    if !cr.ingress_named.is_empty() {
                        for r in &cr.remotes {
                            for k in named_keys(cr, local, *r) {
                                out.allow.entry(k).or_insert(cr.rule_id);
                            }
                        }
                    }
                }
            }
        }
        Some(out)
    }

    /// Brings local endpoint `ep`'s allow set from rule `key` as `old` to the rule as compiled now, entry
    /// by entry: what the rule no longer allows goes to the next rule (in policy, then rule order) that
    /// allows it, if any; what it newly allows is its own unless an earlier rule has it. Returns the
    /// allow groups that changed, or `None` if the change is not one a patch can make (then the
    /// endpoint is compiled whole).
    pub(super) fn patch_endpoint(
        &mut self,
        ep: &ObjectRef,
        key: &RuleKey,
        old: &CompiledRule,
    ) -> Option<BTreeSet<AllowGroup>> {
        let new = self.st.compiled.get(key)?;
        let local = self.st.locals.get(ep)?;
        // A rule of a policy that does not decide this direction of the endpoint gives it nothing.
        let policy = self.st.policies.get(&key.0)?;
        if !self.decides(policy, key.1, self.audited_only(local, key.1)) {
            return Some(BTreeSet::new());
        }
        if new.rule_id != old.rule_id
            || new.ingress_named != old.ingress_named
            || !self.desired.endpoints.contains_key(ep)
        {
            return None;
        }
        let mut removed = sorted_difference(&old.keys, &new.keys);
        let mut added = sorted_difference(&new.keys, &old.keys);
        if !new.ingress_named.is_empty() {
            let named = |cr: &CompiledRule, remotes: Vec<&u32>| -> Vec<AllowKey> {
                remotes
                    .into_iter()
                    .flat_map(|r| named_keys(cr, local, *r))
                    .collect()
            };
            removed.extend(named(old, old.remotes.difference(&new.remotes).collect()));
            added.extend(named(new, new.remotes.difference(&old.remotes).collect()));
        }
        let rule_id = new.rule_id;
        let mut groups = BTreeSet::new();
        let mut updates: Vec<(AllowKey, Option<u32>)> = Vec::new();
        {
            let allow = &self.desired.endpoints[ep].allow;
            for k in &removed {
                if allow.get(k) == Some(&rule_id) {
                    updates.push((*k, self.first_provider(local, k)));
                }
            }
            for k in &added {
                match allow.get(k) {
                    None => updates.push((*k, Some(rule_id))),
                    Some(current) if *current != rule_id && self.earlier(rule_id, *current) => {
                        updates.push((*k, Some(rule_id)));
                    }
                    Some(_) => {}
                }
            }
        }
        let allow = &mut self.desired.endpoints.get_mut(ep).expect("endpoint").allow;
        for (k, value) in updates {
            let before = match value {
                Some(id) => allow.insert(k, id),
                None => allow.remove(&k),
            };
            if before != value {
                groups.insert(k.group());
            }
        }
        Some(groups)
    }

    /// Whether rule `a` comes before rule `b` (both of one direction of one endpoint): in policy order,
    /// then rule order.
    pub(super) fn earlier(&self, a: u32, b: u32) -> bool {
        match (self.desired.rules.get(&a), self.desired.rules.get(&b)) {
            (Some(a), Some(b)) => (&a.policy, a.index) < (&b.policy, b.index),
            _ => false,
        }
    }

    /// Whether no enforced policy among those selecting `local` isolates `direction`: then audited ones
    /// decide it (reported, not enforced); otherwise only the enforced ones do.
    pub(super) fn audited_only(&self, local: &Local, direction: u8) -> bool {
        !local.selected_by.iter().any(|p| {
            let p = &self.st.policies[p];
            !p.audit && isolates(p, direction)
        })
    }

    /// Whether `policy` (selecting the endpoint) decides its `direction`: it isolates it, and it is
    /// enforced, or audited where nothing enforced isolates (`audited_only`).
    pub(super) fn decides(&self, policy: &NetworkPolicy, direction: u8, audited_only: bool) -> bool {
        isolates(policy, direction) && policy.audit == audited_only
    }

    /// The rule id of the first rule (policy, then rule order) that gives `local` the entry `k`.
    pub(super) fn first_provider(&self, local: &Local, k: &AllowKey) -> Option<u32> {
        let audited_only = self.audited_only(local, k.direction);
        for p in &local.selected_by {
            let policy = &self.st.policies[p];
            if !self.decides(policy, k.direction, audited_only) {
                continue;
            }
            let n = if k.direction == dir::INGRESS {
                policy.ingress.len()
            } else {
                policy.egress.len()
            };
            for ri in 0..n {
                let Some(cr) = self.st.compiled.get(&(p.clone(), k.direction, ri)) else {
                    continue;
                };
                if cr.keys.binary_search(k).is_ok() || named_keys(cr, local, k.remote).contains(k) {
                    return Some(cr.rule_id);
                }
            }
        }
        None
    }
}

fn isolates(p: &NetworkPolicy, direction: u8) -> bool {
    if direction == dir::INGRESS {
        p.isolates_ingress
    } else {
        p.isolates_egress
    }
}

/// The entries an ingress rule's named ports give endpoint `local` for remote `remote`: "If this is a
/// string, it must be a named port on the pod" — the pod being the one the policy selects, for ingress.
fn named_keys(cr: &CompiledRule, local: &Local, remote: u32) -> Vec<AllowKey> {
    if !cr.remotes.contains(&remote) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (name, protocol) in &cr.ingress_named {
        for port in local
            .ports
            .iter()
            .filter(|c| c.name.as_deref() == Some(name.as_str()) && c.protocol == *protocol)
        {
            out.push(AllowKey {
                direction: dir::INGRESS,
                remote,
                protocol: protocol.number(),
                port_lo: port.port,
                port_hi: port.port,
            });
        }
    }
    out
}

/// The elements of sorted `a` that are not in sorted `b`.
fn sorted_difference(a: &[AllowKey], b: &[AllowKey]) -> Vec<AllowKey> {
    let mut out = Vec::new();
    let mut j = 0;
    for x in a {
        while j < b.len() && b[j] < *x {
            j += 1;
        }
        if j >= b.len() || b[j] != *x {
            out.push(*x);
        }
    }
    out
}
