//! `canonical`: to be written (issue 2).
