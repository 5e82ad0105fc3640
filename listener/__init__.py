"""The daemon side of mongotune: everything that watches and writes MongoDB on a user's behalf."""
