//! Muster's wire contract: the gRPC API generated from `proto/muster/v1/*.proto` ([`pb`]), and
//! the conversions between its messages and Muster's vocabulary (`muster-machinery`) in
//! [`convert`]. Nothing else: the domain types, their validation and every rule live in
//! `muster-machinery` or in the programs.

pub mod convert;

/// Generated protobuf and gRPC code.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("muster.v1");
}

pub use convert::WireError;
