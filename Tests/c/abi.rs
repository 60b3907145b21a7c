// The header's functions from Rust, declared by hand in an extern "C" block, as a Rust VMM would (or bindgen).
use std::ffi::CStr;
use std::os::raw::{c_char, c_int};

extern "C" {
    fn migrated_abi_version() -> u32;
    fn migrated_abi_check(header_version: u32) -> c_int;
    fn migrated_error_name(code: c_int) -> *const c_char;
    fn migrated_last_error() -> *const c_char;
}

fn main() {
    unsafe {
        let refused = migrated_abi_check(migrated_abi_version() + 1);
        let name = CStr::from_ptr(migrated_error_name(refused)).to_str().unwrap();
        let why = CStr::from_ptr(migrated_last_error()).to_str().unwrap();
        println!("abi {} {} {}", migrated_abi_version(), name, !why.is_empty());
    }
}
