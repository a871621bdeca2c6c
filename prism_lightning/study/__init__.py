"""`prism study`: the paper's persona-effect analysis (task type x persona length x placement x other-persona control)."""
