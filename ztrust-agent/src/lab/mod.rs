//! The lab: a node built from network namespaces.
