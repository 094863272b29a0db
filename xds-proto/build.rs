fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/bosun/config/v1/config.proto",
        "proto/bosun/testing/v1/echo.proto",
        "proto/envoy/service/discovery/v3/ads.proto",
        "proto/istio/v1/auth/ca.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .btree_map(".")
        .extern_path(".google.protobuf.Any", "crate::Any")
        .type_attribute(".bosun.config", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
