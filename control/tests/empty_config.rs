//! An empty, truncated or missing config is refused, never applied as "no
//! resources" (the file source, `bosun validate` and the etcd source all
//! load through these functions).

use bosun_control::load::{load_path, load_sources, parse_file};

#[test]
fn an_empty_or_comment_only_file_is_refused_with_its_name() {
    for text in [
        "",
        "\n\n",
        "# nothing yet\n",
        "---\n---\n",
        "  # a\n---\n# b\n",
    ] {
        let (_, errors) = parse_file("mesh.yaml", text);
        assert_eq!(errors.len(), 1, "{text:?}");
        assert_eq!(errors[0].file, "mesh.yaml");
        assert!(errors[0].message.contains("no resources"), "{}", errors[0]);
    }
}

#[test]
fn a_source_with_no_files_or_keys_is_refused() {
    let e = load_sources(&[]).expect_err("nothing is not a config");
    assert!(e.to_string().contains("no config files"), "{e}");
}

#[test]
fn a_missing_or_empty_directory_is_refused() {
    let dir = std::env::temp_dir().join(format!("bosun-empty-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(load_path(&dir).is_err(), "a missing path");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("notes.txt"), "not config").expect("write");
    let e = load_path(&dir).expect_err("no config files");
    assert!(e.to_string().contains("no config files"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
