//! Every kernel parses and validates with naga, exactly as the GPU backend composes
//! it (shared prelude included). Needs no GPU.

#[test]
fn every_kernel_validates_with_naga() {
    let names: Vec<&str> = microclip::shaders::kernel_names().collect();
    assert_eq!(names.len(), 5);
    for name in names {
        let source = microclip::shaders::kernel_source(name).unwrap();
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&source)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert!(
            module.entry_points.iter().any(|e| e.name == "main"),
            "{name}: no main"
        );
    }
}

#[test]
fn every_wgsl_file_is_used() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let used = microclip::shaders::kernel_names().any(|k| {
            microclip::shaders::kernel_source(k)
                .unwrap()
                .contains(&text)
        });
        assert!(used, "{stem}.wgsl is not part of any kernel");
    }
}
