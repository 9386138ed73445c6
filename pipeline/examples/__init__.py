"""Worked examples on real, published data that ships inside a Python package (no downloads):
`easyvqa`, the easy-VQA visual-question-answering data set."""
