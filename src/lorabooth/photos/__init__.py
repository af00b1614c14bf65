"""The subject: photo folders, prepare, captions and the identifier that names it."""
