"""Working folders: snapshot them into the store, restore them from it."""
