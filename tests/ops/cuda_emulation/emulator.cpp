// The fiber switch of the CUDA emulation (emulator.h), System V x86-64: push the
// callee-saved registers, swap stack pointers, pop the other fiber's registers, return
// into it. The floating-point control words are never changed by the emulated code.
#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

asm(R"(
    .text
    .globl fastguide_emulation_switch
    .type fastguide_emulation_switch, @function
fastguide_emulation_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fastguide_emulation_switch, .-fastguide_emulation_switch
    .section .note.GNU-stack,"",@progbits
)");
