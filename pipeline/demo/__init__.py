"""The embedded default: generated "shapes and captions" data with planted bugs, two fusion
models trained by the project itself, and their weights cache. No files, no downloads."""
