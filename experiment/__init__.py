"""A run outside its model: its folder and layout (run_folders.RunFolder), its checkpoint and exported files and
their checks, the private Lightning APIs they use, and a person's mistakes told as one line."""
