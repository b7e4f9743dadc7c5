"""Conformance vectors: what the Python side computes, written for the Swift package's tests to replay."""
