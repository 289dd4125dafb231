"""Training the document's network with jbn."""
