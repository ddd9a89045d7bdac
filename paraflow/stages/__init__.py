"""The stages of the text-to-image graph, one file each."""
