"""Reports: notebook HTML, regression plots across runs, Perfetto export, the demo."""
