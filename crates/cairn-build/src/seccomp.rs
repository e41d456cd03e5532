//! The builder's system-call filter, as Nix 2.8 installs it (`filter-syscalls`): a builder may
//! not make a file setuid or setgid (`chmod`, `fchmod`, `fchmodat`, `fchmodat2` with either bit
//! fail with `EPERM`), nor give one extended attributes or ACLs (`setxattr` and its variants
//! fail with `ENOTSUP`: a NAR cannot carry them). Every other call is allowed.
//!
//! Why a filter when outputs lose those bits anyway ([`crate::outputs`] canonicalises them):
//! a build must fail where Nix's fails — a builder that checks that its `chmod u+s` worked
//! would otherwise build here and not there — and a setuid file must not exist even for the
//! length of a build, where another process of the build user could run it.
//!
//! The filter covers every ABI a process of this machine can call the kernel with: on x86-64
//! the 64-bit calls, the x32 ones (the same numbers with bit 30 set) and the 32-bit `int 0x80`
//! ones, which have their own numbers; on AArch64 the 64-bit and the 32-bit ARM ones. A call
//! from any other architecture kills the process, as libseccomp's default does.
//!
//! [`program`] builds the classic BPF program as a pure value; [`install`] loads it.

use std::io;

/// One BPF instruction (`struct sock_filter`).
pub type Insn = nix::libc::sock_filter;

// Classic BPF opcodes (linux/bpf_common.h).
/// `BPF_LD | BPF_W | BPF_ABS`
const LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K`
const JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JSET | BPF_K`
const JSET_K: u16 = 0x45;
/// `BPF_ALU | BPF_AND | BPF_K`
const AND_K: u16 = 0x54;
/// `BPF_RET | BPF_K`
const RET_K: u16 = 0x06;

// `struct seccomp_data` offsets.
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of argument `n` (the machines this runs on are little-endian).
const fn arg_low(n: u32) -> u32 {
    16 + 8 * n
}

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;

/// The x32 ABI's marker bit in a system call number.
const X32_BIT: u32 = 0x4000_0000;
/// `S_ISUID | S_ISGID`.
const SET_ID_BITS: u32 = 0o6000;

/// What a filtered call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Fails with `EPERM` if argument `n` (a mode) has the setuid or setgid bit.
    SetIdMode(u32),
    /// Always fails with this errno.
    Errno(i32),
}

/// The filtered calls of one ABI: its `AUDIT_ARCH_*` value, whether its numbers may carry the
/// x32 bit, and (number, rule) pairs.
#[derive(Debug, Clone)]
pub struct Abi {
    pub arch: u32,
    pub x32: bool,
    pub calls: Vec<(u32, Rule)>,
}

/// The calls both of Nix's rules name, for an ABI whose numbers are given. `fchmodat2` (452)
/// and `setxattrat` (463) came after Nix 2.8 and reach the same effect, so they are filtered
/// too; they have one number on every architecture.
fn calls(chmod: Option<u32>, fchmod: u32, fchmodat: u32, setxattr: [u32; 3]) -> Vec<(u32, Rule)> {
    let enotsup = Rule::Errno(nix::libc::ENOTSUP);
    let mut v: Vec<(u32, Rule)> = chmod.map(|n| (n, Rule::SetIdMode(1))).into_iter().collect();
    v.extend([(fchmod, Rule::SetIdMode(1)), (fchmodat, Rule::SetIdMode(2)), (452, Rule::SetIdMode(2))]);
    v.extend(setxattr.iter().map(|&n| (n, enotsup)));
    v.push((463, enotsup));
    v
}

/// The ABIs of this machine (numbers from the kernel's syscall tables).
pub fn abis() -> Vec<Abi> {
    // 32-bit x86 and 32-bit ARM (EABI) share these numbers.
    let i386_or_arm = |arch, fchmodat| Abi { arch, x32: false, calls: calls(Some(15), 94, fchmodat, [226, 227, 228]) };
    if cfg!(target_arch = "aarch64") {
        vec![
            Abi { arch: 0xC000_00B7, x32: false, calls: calls(None, 52, 53, [5, 6, 7]) },
            i386_or_arm(0x4000_0028, 333),
        ]
    } else {
        vec![
            Abi { arch: 0xC000_003E, x32: true, calls: calls(Some(90), 91, 268, [188, 189, 190]) },
            i386_or_arm(0x4000_0003, 306),
        ]
    }
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// The BPF program for `abis`: dispatch on the architecture, then on the call number; each
/// rule's check follows its comparison and ends in a return, so a call that does not match
/// skips it with the call number still loaded.
pub fn program(abis: &[Abi]) -> Vec<Insn> {
    let mut p = vec![insn(LD_W_ABS, 0, 0, ARCH)];
    for abi in abis {
        let mut block = vec![insn(LD_W_ABS, 0, 0, NR)];
        if abi.x32 {
            block.push(insn(AND_K, 0, 0, !X32_BIT));
        }
        for &(nr, rule) in &abi.calls {
            let body = match rule {
                Rule::SetIdMode(n) => vec![
                    insn(LD_W_ABS, 0, 0, arg_low(n)),
                    insn(JSET_K, 0, 1, SET_ID_BITS),
                    insn(RET_K, 0, 0, RET_ERRNO | nix::libc::EPERM as u32),
                    insn(RET_K, 0, 0, RET_ALLOW),
                ],
                Rule::Errno(e) => vec![insn(RET_K, 0, 0, RET_ERRNO | e as u32)],
            };
            block.push(insn(JEQ_K, 0, body.len() as u8, nr));
            block.extend(body);
        }
        block.push(insn(RET_K, 0, 0, RET_ALLOW));
        p.push(insn(JEQ_K, 0, u8::try_from(block.len()).unwrap_or(u8::MAX), abi.arch));
        p.extend(block);
    }
    p.push(insn(RET_K, 0, 0, RET_KILL_PROCESS));
    p
}

/// Loads the filter of this machine's ABIs into the calling thread (and what it executes).
/// `no_new_privs` must be set first: an unprivileged process may install a filter only then.
pub fn install() -> io::Result<()> {
    let prog = program(&abis());
    let fprog = nix::libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies the program.
    #[allow(unsafe_code)]
    let r = unsafe {
        nix::libc::prctl(
            nix::libc::PR_SET_SECCOMP,
            nix::libc::SECCOMP_MODE_FILTER as nix::libc::c_ulong,
            &fprog as *const nix::libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    /// Runs the classic BPF program on one call, as the kernel would.
    fn run(p: &[Insn], arch: u32, nr: u32, args: [u32; 6]) -> u32 {
        let word = |off: u32| match off {
            NR => nr,
            ARCH => arch,
            o if (16..64).contains(&o) && (o - 16) % 8 == 0 => args[((o - 16) / 8) as usize],
            o => panic!("load of offset {o}"),
        };
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => a = word(i.k),
                AND_K => a &= i.k,
                JEQ_K => pc += if a == i.k { i.jt } else { i.jf } as usize,
                JSET_K => pc += if a & i.k != 0 { i.jt } else { i.jf } as usize,
                RET_K => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    const EPERM: u32 = RET_ERRNO | nix::libc::EPERM as u32;
    const ENOTSUP: u32 = RET_ERRNO | nix::libc::ENOTSUP as u32;
    const X86_64: u32 = 0xC000_003E;
    const I386: u32 = 0x4000_0003;

    #[test]
    fn setuid_and_setgid_modes_are_refused_on_every_x86_abi_and_other_modes_pass() {
        let p = program(&abis_for_x86());
        for (arch, chmod, fchmodat) in [(X86_64, 90, 268), (X86_64, X32_BIT | 90, X32_BIT | 268), (I386, 15, 306)] {
            for (mode, want) in
                [(0o4755, EPERM), (0o2755, EPERM), (0o6000, EPERM), (0o755, RET_ALLOW), (0o1777, RET_ALLOW)]
            {
                assert_eq!(run(&p, arch, chmod, [0, mode, 0, 0, 0, 0]), want, "chmod {mode:o} arch {arch:#x}");
                assert_eq!(run(&p, arch, fchmodat, [0, 0, mode, 0, 0, 0]), want, "fchmodat {mode:o}");
                assert_eq!(run(&p, arch, 452, [0, 0, mode, 0, 0, 0]), want, "fchmodat2 {mode:o}");
            }
            // The mode is not where chmod's check looks for fchmodat's.
            assert_eq!(run(&p, arch, chmod, [0o4755, 0o644, 0o4755, 0, 0, 0]), RET_ALLOW);
        }
        for nr in [188, 189, 190, 463] {
            assert_eq!(run(&p, X86_64, nr, [0; 6]), ENOTSUP, "setxattr family {nr}");
        }
        for nr in [226, 227, 228] {
            assert_eq!(run(&p, I386, nr, [0; 6]), ENOTSUP, "i386 setxattr family {nr}");
        }
        // Calls that share a number with a filtered one on another ABI are left alone.
        assert_eq!(run(&p, X86_64, 15, [0, 0o4755, 0, 0, 0, 0]), RET_ALLOW, "rt_sigreturn on x86-64");
        assert_eq!(run(&p, I386, 90, [0, 0o4755, 0, 0, 0, 0]), RET_ALLOW, "old mmap on i386");
        assert_eq!(run(&p, 0xC000_00B7, 53, [0; 6]), RET_KILL_PROCESS, "an ABI the machine does not have");
    }

    fn abis_for_x86() -> Vec<Abi> {
        vec![
            Abi { arch: X86_64, x32: true, calls: calls(Some(90), 91, 268, [188, 189, 190]) },
            Abi { arch: I386, x32: false, calls: calls(Some(15), 94, 306, [226, 227, 228]) },
        ]
    }

    #[test]
    fn this_machines_program_is_the_one_tested() {
        if cfg!(target_arch = "x86_64") {
            let (a, b) = (program(&abis()), program(&abis_for_x86()));
            let key = |p: &[Insn]| p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect::<Vec<_>>();
            assert_eq!(key(&a), key(&b));
        }
    }

    /// The filter loaded in a child process: the kernel refuses a setuid `chmod` and an
    /// extended attribute, and lets a plain `chmod` through.
    #[test]
    #[allow(unsafe_code)]
    fn the_loaded_filter_refuses_setuid_chmod_and_xattrs_in_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let c = CString::new(file.as_os_str().as_bytes()).unwrap();
        let (name, value) = (CString::new("user.cairn").unwrap(), b"v");
        let prog = program(&abis());
        let fprog = nix::libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
        // SAFETY: the child calls only async-signal-safe functions on memory prepared before the
        // fork, and ends with `_exit`.
        let pid = unsafe { nix::libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            unsafe {
                use nix::libc::*;
                let mut code = 0;
                if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    _exit(90);
                }
                if prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER as c_ulong, &fprog as *const sock_fprog) != 0 {
                    _exit(91);
                }
                if chmod(c.as_ptr(), 0o4755) != -1 || *__errno_location() != EPERM {
                    code |= 1;
                }
                if fchmodat(AT_FDCWD, c.as_ptr(), 0o2755, 0) != -1 || *__errno_location() != EPERM {
                    code |= 2;
                }
                if chmod(c.as_ptr(), 0o755) != 0 {
                    code |= 4;
                }
                if setxattr(c.as_ptr(), name.as_ptr(), value.as_ptr().cast(), 1, 0) != -1
                    || *__errno_location() != ENOTSUP
                {
                    code |= 8;
                }
                _exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { nix::libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(nix::libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(
            nix::libc::WEXITSTATUS(status),
            0,
            "bits: 1 setuid chmod, 2 setgid fchmodat, 4 plain chmod, 8 xattr"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o7777, 0o755);
    }
}
