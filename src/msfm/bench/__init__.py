"""msfm.bench."""
