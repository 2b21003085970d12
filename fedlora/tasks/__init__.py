"""What a federated run trains the model to do: the pieces of each task, pure and tested."""
