"""Plant-side sources behind one ``Source`` protocol (see ``bridge.sources.base``)."""
