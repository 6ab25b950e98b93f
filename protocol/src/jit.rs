//! `jit`: to be written (issue 2).
