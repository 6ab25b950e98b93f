//! `error`: to be written (issue 2).
