//! The functions the benchmarks patch and call, and the loops that call them.
//!
//! Every function here has the same small body, `x * K ^ (x >> 29)`, with a constant `K` of
//! its own (so that no linker folds two of them into one) and an unmangled name a patch can
//! replace. [`source`] writes the same function as Rust source for a patch, so a patch to "the
//! same code" compiles to the same instructions as the function it replaces.
//!
//! The call loops are separate functions, one per callee, so that each has its own direct
//! `call rel32` (which dsu rewrites when it redirects the callee) or its own indirect call
//! through a pointer (which keeps going through the old entry).

use std::hint::black_box;

/// A function of the shape every target has.
pub type Target = extern "C" fn(u64) -> u64;

/// The constant of target `i`.
pub const fn k(i: u64) -> u64 {
    0x9E37_79B9_7F4A_7C15_u64.wrapping_add(i.wrapping_mul(0x1_0000_0002))
}

/// Right shift of the original functions; patches that change code use [`CHANGED_SHIFT`].
pub const SHIFT: u32 = 29;
/// Right shift of a changed version (same size, different result).
pub const CHANGED_SHIFT: u32 = 31;

macro_rules! target {
    ($name:ident, $k:expr) => {
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name(x: u64) -> u64 {
            x.wrapping_mul($k) ^ (x >> SHIFT)
        }
    };
}

macro_rules! targets {
    ($($name:ident = $i:literal),* $(,)?) => {
        $(target!($name, k($i));)*
        /// The 50 functions a many-function patch replaces, `dsu_bench_f00` ..
        /// `dsu_bench_f49`; target `i` uses constant `k(i)`.
        pub static TARGETS: [Target; 50] = [$($name),*];
    };
}

targets! {
    dsu_bench_f00 = 0, dsu_bench_f01 = 1, dsu_bench_f02 = 2, dsu_bench_f03 = 3,
    dsu_bench_f04 = 4, dsu_bench_f05 = 5, dsu_bench_f06 = 6, dsu_bench_f07 = 7,
    dsu_bench_f08 = 8, dsu_bench_f09 = 9, dsu_bench_f10 = 10, dsu_bench_f11 = 11,
    dsu_bench_f12 = 12, dsu_bench_f13 = 13, dsu_bench_f14 = 14, dsu_bench_f15 = 15,
    dsu_bench_f16 = 16, dsu_bench_f17 = 17, dsu_bench_f18 = 18, dsu_bench_f19 = 19,
    dsu_bench_f20 = 20, dsu_bench_f21 = 21, dsu_bench_f22 = 22, dsu_bench_f23 = 23,
    dsu_bench_f24 = 24, dsu_bench_f25 = 25, dsu_bench_f26 = 26, dsu_bench_f27 = 27,
    dsu_bench_f28 = 28, dsu_bench_f29 = 29, dsu_bench_f30 = 30, dsu_bench_f31 = 31,
    dsu_bench_f32 = 32, dsu_bench_f33 = 33, dsu_bench_f34 = 34, dsu_bench_f35 = 35,
    dsu_bench_f36 = 36, dsu_bench_f37 = 37, dsu_bench_f38 = 38, dsu_bench_f39 = 39,
    dsu_bench_f40 = 40, dsu_bench_f41 = 41, dsu_bench_f42 = 42, dsu_bench_f43 = 43,
    dsu_bench_f44 = 44, dsu_bench_f45 = 45, dsu_bench_f46 = 46, dsu_bench_f47 = 47,
    dsu_bench_f48 = 48, dsu_bench_f49 = 49,
}

/// Name of target `i` of [`TARGETS`].
pub fn target_name(i: usize) -> String {
    format!("dsu_bench_f{i:02}")
}

// The steady-state subjects: never patched, patched in place, patched by redirect, detoured by
// retour; and the install-time subjects. Constants 100.. keep them apart from TARGETS.
pub const K_NATIVE: u64 = k(100);
pub const K_IN_PLACE: u64 = k(101);
pub const K_REDIRECT: u64 = k(102);
pub const K_RETOUR: u64 = k(103);
pub const K_PEER_DSU: u64 = k(104);
pub const K_PEER_RETOUR: u64 = k(105);
/// Constant of the retour replacement: with `K_RETOUR` itself rustc would merge the two
/// functions into one (LLVM's function merging), which retour refuses to detour.
pub const K_RETOUR_REPLACEMENT: u64 = k(106);

/// The steady-state subjects of one program, defined by [`subjects!`](crate::subjects) in
/// that program's own crate.
#[derive(Debug, Clone, Copy)]
pub struct Subjects {
    /// `dsu_bench_native`: never patched.
    pub native: Target,
    /// `dsu_bench_in_place`: patched in place.
    pub in_place: Target,
    /// `dsu_bench_redirect`: redirected (entry jump, call sites rewritten).
    pub redirect: Target,
    /// `dsu_bench_retour`: detoured by retour to `retour_replacement`.
    pub retour: Target,
    pub retour_replacement: Target,
    /// `dsu_bench_peer_dsu`: what dsu applies to, over and over, for the install time.
    pub peer_dsu: Target,
    /// `dsu_bench_peer_retour`: what retour detours to `peer_replacement`, over and over.
    pub peer_retour: Target,
    pub peer_replacement: Target,
    /// `n` direct calls of `native`, `in_place`, `redirect`, `retour`.
    pub loop_native: fn(u64) -> u64,
    pub loop_in_place: fn(u64) -> u64,
    pub loop_redirect: fn(u64) -> u64,
    pub loop_retour: fn(u64) -> u64,
}

/// Defines the steady-state subjects in the crate that invokes it, as `SUBJECTS`.
///
/// They must live in the executable's own crate: there a call to them is a direct
/// `call rel32`, which dsu rewrites. Called from another crate (an rlib), rustc reaches an
/// exported `#[no_mangle]` function through the GOT, and in a loop LLVM hoists that load and
/// calls through a register: an indirect call, which keeps going through the entry jump.
#[macro_export]
macro_rules! subjects {
    () => {
        mod dsu_bench_subjects {
            use std::hint::black_box;

            use $crate::targets::{
                CHANGED_SHIFT, K_IN_PLACE, K_NATIVE, K_PEER_DSU, K_PEER_RETOUR, K_REDIRECT,
                K_RETOUR, K_RETOUR_REPLACEMENT, SHIFT, Subjects,
            };

            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn dsu_bench_native(x: u64) -> u64 {
                x.wrapping_mul(K_NATIVE) ^ (x >> SHIFT)
            }

            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn dsu_bench_in_place(x: u64) -> u64 {
                x.wrapping_mul(K_IN_PLACE) ^ (x >> SHIFT)
            }

            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn dsu_bench_redirect(x: u64) -> u64 {
                x.wrapping_mul(K_REDIRECT) ^ (x >> SHIFT)
            }

            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn dsu_bench_retour(x: u64) -> u64 {
                x.wrapping_mul(K_RETOUR) ^ (x >> SHIFT)
            }

            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn retour_replacement(x: u64) -> u64 {
                x.wrapping_mul(K_RETOUR_REPLACEMENT) ^ (x >> SHIFT)
            }

            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn dsu_bench_peer_dsu(x: u64) -> u64 {
                x.wrapping_mul(K_PEER_DSU) ^ (x >> SHIFT)
            }

            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn dsu_bench_peer_retour(x: u64) -> u64 {
                x.wrapping_mul(K_PEER_RETOUR) ^ (x >> SHIFT)
            }

            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn peer_replacement(x: u64) -> u64 {
                x.wrapping_mul(K_PEER_RETOUR) ^ (x >> CHANGED_SHIFT)
            }

            #[inline(never)]
            fn loop_native(n: u64) -> u64 {
                let mut acc = 0u64;
                for i in 0..n {
                    acc ^= dsu_bench_native(black_box(i));
                }
                acc
            }

            #[inline(never)]
            fn loop_in_place(n: u64) -> u64 {
                let mut acc = 0u64;
                for i in 0..n {
                    acc ^= dsu_bench_in_place(black_box(i));
                }
                acc
            }

            #[inline(never)]
            fn loop_redirect(n: u64) -> u64 {
                let mut acc = 0u64;
                for i in 0..n {
                    acc ^= dsu_bench_redirect(black_box(i));
                }
                acc
            }

            #[inline(never)]
            fn loop_retour(n: u64) -> u64 {
                let mut acc = 0u64;
                for i in 0..n {
                    acc ^= dsu_bench_retour(black_box(i));
                }
                acc
            }

            pub static SUBJECTS: Subjects = Subjects {
                native: dsu_bench_native,
                in_place: dsu_bench_in_place,
                redirect: dsu_bench_redirect,
                retour: dsu_bench_retour,
                retour_replacement,
                peer_dsu: dsu_bench_peer_dsu,
                peer_retour: dsu_bench_peer_retour,
                peer_replacement,
                loop_native,
                loop_in_place,
                loop_redirect,
                loop_retour,
            };
        }
        use dsu_bench_subjects::SUBJECTS;
    };
}

/// Rust source of one target named `name` with constant `k` and shift `shift`, as a patch
/// defines it. With `section`, the function goes into that code section (see
/// [`crate::patches`]).
pub fn source(name: &str, k: u64, shift: u32, section: Option<&str>) -> String {
    let section = section.map_or(String::new(), |s| {
        format!("#[unsafe(link_section = \"{s}\")]\n")
    });
    format!(
        "#[unsafe(no_mangle)]\n{section}pub extern \"C\" fn {name}(x: u64) -> u64 {{\n    \
         x.wrapping_mul({k:#x}) ^ (x >> {shift})\n}}\n"
    )
}

/// Calls `f` `n` times through a pointer (an indirect call: it reaches a patched function
/// through its old entry).
#[inline(never)]
pub fn loop_ptr(f: Target, n: u64) -> u64 {
    let f = black_box(f);
    let mut acc = 0u64;
    for i in 0..n {
        acc ^= f(black_box(i));
    }
    acc
}

/// The work of a CPU-bound thread: never patched.
#[inline(never)]
pub fn spin(x: u64) -> u64 {
    let mut x = x;
    for _ in 0..64 {
        x = black_box(x.rotate_left(7) ^ 0x5555);
    }
    x
}

/// Calls every target once (keeps them all linked in).
#[inline(never)]
pub fn touch_all(x: u64) -> u64 {
    let mut acc = x;
    for f in &TARGETS {
        acc ^= black_box(*f)(acc);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_matches_the_compiled_function() {
        let s = source("dsu_bench_f07", k(7), SHIFT, None);
        assert!(s.contains(&format!("{:#x}", k(7))));
        assert_eq!(TARGETS[7](3), 3u64.wrapping_mul(k(7)) ^ (3 >> SHIFT));
    }
}
