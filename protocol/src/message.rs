//! `message`: to be written (issue 2).
