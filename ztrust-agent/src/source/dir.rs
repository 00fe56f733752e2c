//! Directory source.
