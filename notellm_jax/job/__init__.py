"""The main job (prepare, train, embed, recall, generate, report) and its report."""
