//! `limits`: to be written (issue 2).
