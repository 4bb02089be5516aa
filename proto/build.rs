//! Generates the gRPC code from `proto/` with a vendored `protoc`, so building Muster never needs a
//! system protobuf compiler.

const SERDE: &str = "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded; prost-build reads PROTOC from the environment.
    #[allow(clippy::disallowed_methods)]
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // No `Client::connect` helper: it would clash with the `Connect` RPC. Clients are built from a Channel.
        .build_transport(false)
        // Inventory is stored and printed as JSON/YAML as-is.
        .type_attribute("muster.v1.Inventory", SERDE)
        .type_attribute("muster.v1.Disk", SERDE)
        .type_attribute("muster.v1.Nic", SERDE)
        .type_attribute("muster.v1.Smbios", SERDE)
        .type_attribute("muster.v1.HealthSnapshot", SERDE)
        .type_attribute("muster.v1.FilesystemUsage", SERDE)
        .type_attribute("muster.v1.NetworkCounters", SERDE)
        .type_attribute("muster.v1.Temperature", SERDE)
        .type_attribute("muster.v1.ServiceCheck", SERDE)
        .compile_protos(&["proto/muster/v1/agent.proto", "proto/muster/v1/admin.proto"], &["proto"])?;
    Ok(())
}
