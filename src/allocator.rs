//! The C allocator's settings for a process that runs the model: tensors of megabytes allocated
//! and freed for every frame and every prompt.
//!
//! With glibc's defaults, an allocation above the mmap threshold (128 KiB, raised as large
//! blocks are freed, to 32 MiB at most) gets pages of its own that `free` returns to the kernel,
//! and the heap is trimmed whenever 128 KiB are free at its top. So the decoder's per-prompt
//! tensors (4 MB image tokens, the mask planes) come back as fresh pages that the kernel must
//! fault in and zero, prompt after prompt, and with two threads the faults also wait on each
//! other. Measured on the default model (`perf stat -e page-faults -- tinysam bench --threads 2
//! --runs 3 --precisions int8 --batches 1,64`, see `docs/performance.md`): 230 000 faults with
//! the defaults, 78 000 with the settings below, and a prompt at batch 64 3-8 % faster, peak RSS
//! no higher. [`keep_freed_memory`] applies them; the binaries call it first thing.
#![allow(unsafe_code)]

/// Allocations below this come from the heap instead of pages of their own.
pub const MMAP_THRESHOLD: usize = 256 << 20;
/// Free memory at the heap's top is returned to the kernel only beyond this.
pub const TRIM_THRESHOLD: usize = 512 << 20;

/// What [`keep_freed_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// Both thresholds set.
    Applied,
    /// `GLIBC_TUNABLES` already sets malloc parameters: the user's choice stands.
    LeftToTheEnvironment,
    /// Not glibc (or it refused a value): the allocator's defaults stand.
    Unsupported,
}

/// Make glibc's allocator keep freed memory for reuse ([`MMAP_THRESHOLD`], [`TRIM_THRESHOLD`])
/// unless `GLIBC_TUNABLES` sets malloc parameters. Process-wide: call it once, early, from a
/// program's `main` (a library embedding the model can call it too).
pub fn keep_freed_memory() -> Tuning {
    let tunables = std::env::var_os("GLIBC_TUNABLES");
    if tunables.is_some_and(|t| t.to_string_lossy().contains("glibc.malloc.")) {
        return Tuning::LeftToTheEnvironment;
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> Tuning {
    let (Ok(mmap), Ok(trim)) = (
        libc::c_int::try_from(MMAP_THRESHOLD),
        libc::c_int::try_from(TRIM_THRESHOLD),
    ) else {
        return Tuning::Unsupported;
    };
    // SAFETY: `mallopt` only changes glibc's allocator parameters (under its own locks); a
    // value it does not accept is refused with 0, not undefined behaviour.
    let applied = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
    };
    if applied {
        Tuning::Applied
    } else {
        Tuning::Unsupported
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> Tuning {
    Tuning::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc accepts both values (a refused one would leave the defaults without a word), and
    /// allocating and freeing a tensor-sized block afterwards works.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_thresholds() {
        if std::env::var_os("GLIBC_TUNABLES").is_some() {
            return;
        }
        assert_eq!(keep_freed_memory(), Tuning::Applied);
        let block = vec![1u8; 4 << 20];
        assert_eq!(
            block.iter().map(|&b| usize::from(b)).sum::<usize>(),
            4 << 20
        );
    }
}
