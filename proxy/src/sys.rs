//! The one place with `unsafe`: system calls with no safe wrapper.
//!
//! ## Resident memory of the code: only the pages the proxy runs
//!
//! The `bosun` binary carries the control service, node mode and the CLI
//! beside the proxy: about 19 MB of machine code. When a page of it is
//! first executed, the kernel maps the neighbouring pages already in the
//! page cache too ("fault-around", 64 KiB by default), and start-up (flag
//! parsing, config loading) touches code the proxy never runs again. At
//! idle a gateway had 11 MB of the binary's code resident; with this,
//! 2.4 MB idle and about 5 MB under load (bench/RESULTS.md).
//!
//! `release_cold_code` marks the binary's own read-only mappings
//! `MADV_RANDOM` (no fault-around, no read-ahead) and drops the pages
//! mapped so far (`MADV_DONTNEED`: they are clean file pages, read again
//! from the page cache on the next touch). What the proxy executes after
//! that comes back page by page. Only mappings that can hold no written
//! data are touched: executable code and the first read-only segment
//! (headers, `.rodata`, unwind tables); never the relocated RELRO segment
//! or anything writable.

#![allow(unsafe_code)]

use std::num::NonZeroUsize;
use std::ptr::NonNull;

/// Drops the resident pages of the binary's code and read-only data and
/// turns fault-around off for them. Returns the bytes of mappings advised.
pub fn release_cold_code() -> usize {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return 0;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    let exe = exe.to_string_lossy();
    let mut advised = 0;
    for line in maps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(offset)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(2).unwrap_or("");
        if path != exe {
            continue;
        }
        let clean =
            perms == "r-xp" || (perms == "r--p" && offset.trim_start_matches('0').is_empty());
        if !clean {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let (Some(addr), Some(len)) = (
            NonNull::new(start as *mut std::ffi::c_void),
            NonZeroUsize::new(end.saturating_sub(start)),
        ) else {
            continue;
        };
        use nix::sys::mman::{MmapAdvise, madvise};
        // SAFETY: the range is a whole mapping of this process, read-only
        // and backed by the unchanged executable file (text, or the
        // segment at offset 0, which the loader never writes). Dropping
        // its pages only makes the next access read them again from the
        // file's page cache; no data of the process is lost.
        let ok = unsafe {
            madvise(addr, len.get(), MmapAdvise::MADV_RANDOM).is_ok()
                && madvise(addr, len.get(), MmapAdvise::MADV_DONTNEED).is_ok()
        };
        if ok {
            advised += len.get();
        }
    }
    advised
}
