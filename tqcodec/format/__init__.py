"""The byte layer of the .tqz format (spec §1-§6, §9, §10, §12-§13): header, manifest, chunks,
index and footer, the readers (front to back, random access) and the writer, and the small
integer forms modes share (LEB128 tables, step codes, dtypes). No torch, no coding modes: a mode
is visible here only through its streams' item counts and payload kinds (``chunks.StreamSpec``)."""
