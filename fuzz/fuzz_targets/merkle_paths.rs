//! REAPI path rules shared by clients, the server and workers: splitting a
//! path, checking an entry name, checking a symlink target, resolving an
//! output path against the working directory. None may panic, and they
//! must agree with each other.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remote_apis::merkle::{check_name, check_symlink_target, path_components, resolve_output_path};

fuzz_target!(|input: (&str, &str)| {
    let (working_directory, path) = input;
    if let Ok(parts) = path_components(path) {
        assert_eq!(parts.join("/"), path, "components of {path:?} do not join back to it");
        for p in &parts {
            assert!(check_name(p).is_ok(), "component {p:?} of accepted path {path:?} is not a valid name");
        }
    }
    if check_name(path).is_ok() {
        assert_eq!(path_components(path).ok(), Some(vec![path]), "a valid name is a one-component path");
    }
    let _ = check_symlink_target(path);
    if let Ok(resolved) = resolve_output_path(working_directory, path) {
        // Whatever `.` and `..` did, the result is a path inside the input
        // root made of valid names.
        for p in &resolved {
            assert!(check_name(p).is_ok(), "{path:?} from {working_directory:?} resolves to a bad name {p:?}");
        }
        // A plain relative path simply extends the working directory.
        if let (Ok(wd), Ok(rel)) = (path_components(working_directory), path_components(path)) {
            assert_eq!(resolved, [wd, rel].concat(), "{path:?} from {working_directory:?}");
        }
    }
});
