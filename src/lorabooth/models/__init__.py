"""Base models: loading (hub, folder, single file, built-ins), the families' differences, memory and speed."""
