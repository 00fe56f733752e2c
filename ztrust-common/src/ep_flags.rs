/// A policy with policyTypes Ingress selects the pod: ingress is default-deny plus allow entries.
pub const ISOLATED_INGRESS: u32 = 1 << 0;
/// A policy with policyTypes Egress selects the pod.
pub const ISOLATED_EGRESS: u32 = 1 << 1;
/// Audit mode: never drop, report `WOULD_DROP` instead.
pub const AUDIT: u32 = 1 << 2;
/// No allow entry of the endpoint's ingress is for any peer ([`identity::ANY`]): the datapath skips
/// that lookup. (Set when there is none, rather than when there is one, so that entries written by an
/// agent that did not know the flag are always looked up.)
pub const NO_ANY_PEER_INGRESS: u32 = 1 << 3;
/// The same for egress.
pub const NO_ANY_PEER_EGRESS: u32 = 1 << 4;
/// No allow entry of the endpoint's ingress for TCP is wider than one port (a port range, any port,
/// any protocol): all of them are in the exact-port hash ([`super::names::POLICY_EXACT`]), and the
/// datapath does not walk the policy trie for TCP ingress. Set when there is none, as above.
pub const NO_WIDE_INGRESS_TCP: u32 = 1 << 5;
/// The same for UDP ingress.
pub const NO_WIDE_INGRESS_UDP: u32 = 1 << 6;
/// The same for ingress of any other protocol.
pub const NO_WIDE_INGRESS_OTHER: u32 = 1 << 7;
/// The same for TCP egress.
pub const NO_WIDE_EGRESS_TCP: u32 = 1 << 8;
/// The same for UDP egress.
pub const NO_WIDE_EGRESS_UDP: u32 = 1 << 9;
/// The same for egress of any other protocol.
pub const NO_WIDE_EGRESS_OTHER: u32 = 1 << 10;
/// The endpoint may send encapsulated packets ([`super::encap`]); without it they are dropped as
/// [`super::reason::ENCAPSULATED`]. Set for every endpoint by `run --pod-tunnels allow` (in
/// [`super::Config::flags`]).
pub const ALLOW_ENCAPSULATION: u32 = 1 << 11;
/// The endpoint's ingress is isolated by audited policies only (`ztrust.io/mode: audit` on each): a
/// policy denial there is reported as [`super::verdict::WOULD_DROP`] and passes, as with [`AUDIT`],
/// for that direction alone.
pub const AUDIT_INGRESS: u32 = 1 << 12;
/// The same for egress.
pub const AUDIT_EGRESS: u32 = 1 << 13;

/// The audit flag of `direction`: [`AUDIT_INGRESS`] or [`AUDIT_EGRESS`].
pub const fn audit_in(direction: u8) -> u32 {
    if direction == super::dir::INGRESS {
        AUDIT_INGRESS
    } else {
        AUDIT_EGRESS
    }
}

/// Every `NO_WIDE_*` flag.
pub const ALL_NO_WIDE: u32 = NO_WIDE_INGRESS_TCP
    | NO_WIDE_INGRESS_UDP
    | NO_WIDE_INGRESS_OTHER
    | NO_WIDE_EGRESS_TCP
    | NO_WIDE_EGRESS_UDP
    | NO_WIDE_EGRESS_OTHER;

/// The `NO_WIDE_*` flag for traffic in `direction` with `protocol`.
pub const fn no_wide(direction: u8, protocol: u8) -> u32 {
    let ingress = direction == super::dir::INGRESS;
    match protocol {
        super::proto::TCP => {
            if ingress {
                NO_WIDE_INGRESS_TCP
            } else {
                NO_WIDE_EGRESS_TCP
            }
        }
        super::proto::UDP => {
            if ingress {
                NO_WIDE_INGRESS_UDP
            } else {
                NO_WIDE_EGRESS_UDP
            }
        }
        _ => {
            if ingress {
                NO_WIDE_INGRESS_OTHER
            } else {
                NO_WIDE_EGRESS_OTHER
            }
        }
    }
}
