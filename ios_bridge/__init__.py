"""The Xcode-ready bundle and the Swift package that runs it."""
