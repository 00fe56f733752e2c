//! The kernel's codes as user space names them: [`Verdict`], [`Direction`] and [`Reason`], each from
//! one table of code, variant and stable name.

use crate::{dir, reason, verdict};

/// An enumeration of kernel codes with their stable names: `from_code` (an unknown code is `Unknown`:
/// a newer kernel program's, never guessed), `code`, `name` and `from_name`.
macro_rules! named_codes {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $code:path, $text:literal;)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A code this build does not know.
            Unknown,
        }

        impl $name {
            /// Every known value, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub const fn from_code(code: u8) -> Self {
                match code {
                    $($code => $name::$variant,)*
                    _ => $name::Unknown,
                }
            }

            /// The kernel's code; `Unknown` is 255, which no kernel code is.
            pub const fn code(self) -> u8 {
                match self {
                    $($name::$variant => $code,)*
                    $name::Unknown => u8::MAX,
                }
            }

            /// The stable name (flow JSON, metric labels, the CLI), `unknown` for `Unknown`.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Unknown => "unknown",
                }
            }

            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some($name::$variant),)*
                    "unknown" => Some($name::Unknown),
                    _ => None,
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_codes! {
    /// A [`verdict`] code.
    Verdict {
        Forwarded = verdict::FORWARDED, "forwarded";
        Dropped = verdict::DROPPED, "dropped";
        WouldDrop = verdict::WOULD_DROP, "would-drop";
    }
}

named_codes! {
    /// A [`dir`] code, relative to the endpoint whose hook judged the packet.
    Direction {
        Ingress = dir::INGRESS, "ingress";
        Egress = dir::EGRESS, "egress";
    }
}

named_codes! {
    /// A [`reason`] code (the names are documented in the README).
    Reason {
        AllowedByPolicy = reason::ALLOWED_BY_POLICY, "allowed-by-policy";
        NotIsolated = reason::NOT_ISOLATED, "not-isolated";
        Established = reason::ESTABLISHED, "established";
        Reply = reason::REPLY, "reply";
        FromHost = reason::FROM_HOST, "from-host";
        NotIp = reason::NOT_IP, "not-ip";
        CtRecovered = reason::CT_RECOVERED, "conntrack-recovered";
        PolicyDenied = reason::POLICY_DENIED, "policy-denied";
        UnknownEndpoint = reason::UNKNOWN_ENDPOINT, "unknown-endpoint";
        Malformed = reason::MALFORMED, "malformed-packet";
        NoCtEntry = reason::NO_CT_ENTRY, "no-conntrack-entry";
        Fragment = reason::FRAGMENT, "fragment";
        SpoofedSource = reason::SPOOFED_SOURCE, "spoofed-source";
        UnsupportedFrame = reason::UNSUPPORTED_FRAME, "unsupported-frame";
        Encapsulated = reason::ENCAPSULATED, "encapsulated";
        SourceRouted = reason::SOURCE_ROUTED, "source-routed";
        ServiceBackendsDiffer = reason::SERVICE_BACKENDS_DIFFER, "service-backends-differ";
        UnknownService = reason::UNKNOWN_SERVICE, "unknown-service";
    }
}
