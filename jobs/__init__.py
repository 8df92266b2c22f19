"""The job library that workers import: built-in jobs, examples, and your own."""
