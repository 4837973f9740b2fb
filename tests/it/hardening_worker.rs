//! Regression tests of the hardening issue.
