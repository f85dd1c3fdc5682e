"""Dataset folders: safe fetching, image normalisation, captions on disk and the manifest."""
