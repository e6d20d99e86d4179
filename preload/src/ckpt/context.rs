//! Saving and resuming an execution context inside the checkpoint signal
//! handler, like setjmp/longjmp but without glibc's pointer mangling (whose
//! guard lives in TLS being restored) and without a signal mask (restored
//! separately, by raw syscall, just before resuming).
//!
//! Only what the SysV ABI says survives a call is saved: rbx, rbp, r12-r15,
//! the stack pointer, the return address, MXCSR and the x87 control word.
//! Everything else of the interrupted program is in the signal frame on its
//! stack, which the kernel restores with `rt_sigreturn` when the handler
//! returns.

/// Saved callee-saved state. Layout used by the assembly below.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Context {
    pub rbx: u64,
    pub rbp: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rsp: u64,
    pub rip: u64,
    /// MXCSR in the low 32 bits, x87 control word in bits 32..48.
    pub fpu: u64,
}

core::arch::global_asm!(
    // mome_ctx_run(ctx, f, arg): saves the context, calls f(arg), returns
    // 0 when f returns. Resuming the context makes this call return 1, in
    // the caller's frame as it was when f ran (so the caller's own saved
    // registers, on its stack, are intact: unlike setjmp, nothing here
    // depends on the compiler knowing that a call returns twice).
    ".globl mome_ctx_run",
    ".type mome_ctx_run,@function",
    ".hidden mome_ctx_run",
    "mome_ctx_run:",
    "mov [rdi + 0], rbx",
    "mov [rdi + 8], rbp",
    "mov [rdi + 16], r12",
    "mov [rdi + 24], r13",
    "mov [rdi + 32], r14",
    "mov [rdi + 40], r15",
    "mov [rdi + 48], rsp",
    "lea rax, [rip + 2f]",
    "mov [rdi + 56], rax",
    "stmxcsr [rdi + 64]",
    "fnstcw [rdi + 68]",
    "mov rdi, rdx",
    "sub rsp, 8",
    "call rsi",
    "add rsp, 8",
    "xor eax, eax",
    "ret",
    "2:",
    "mov eax, 1",
    "ret",
    ".size mome_ctx_run, .-mome_ctx_run",
    "",
    ".globl mome_ctx_resume",
    ".type mome_ctx_resume,@function",
    ".hidden mome_ctx_resume",
    "mome_ctx_resume:",
    "mov rbx, [rdi + 0]",
    "mov rbp, [rdi + 8]",
    "mov r12, [rdi + 16]",
    "mov r13, [rdi + 24]",
    "mov r14, [rdi + 32]",
    "mov r15, [rdi + 40]",
    "ldmxcsr [rdi + 64]",
    "fldcw [rdi + 68]",
    "mov rsp, [rdi + 48]",
    "jmp qword ptr [rdi + 56]",
    ".size mome_ctx_resume, .-mome_ctx_resume",
    "",
    // Calls `f(arg)` on the stack whose top is `top` (16-byte aligned);
    // `f` must not return.
    ".globl mome_call_on_stack",
    ".type mome_call_on_stack,@function",
    ".hidden mome_call_on_stack",
    "mome_call_on_stack:",
    "mov rsp, rdi",
    "mov rdi, rdx",
    "xor ebp, ebp",
    "call rsi",
    "ud2",
    ".size mome_call_on_stack, .-mome_call_on_stack",
);

extern "C" {
    /// Saves the caller's context and calls `f(arg)`; returns 0 when `f`
    /// returns, 1 when the context is resumed.
    pub fn mome_ctx_run(ctx: *mut Context, f: extern "C" fn(u64), arg: u64) -> u64;
    /// Resumes a saved context: its `mome_ctx_save` returns 1. The stack
    /// the context refers to must hold what it held when it was saved.
    pub fn mome_ctx_resume(ctx: *const Context) -> !;
    /// Switches to the stack ending at `top` and calls `f(arg)` there.
    pub fn mome_call_on_stack(top: u64, f: extern "C" fn(u64) -> !, arg: u64) -> !;
}
