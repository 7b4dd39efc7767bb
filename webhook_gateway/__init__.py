"""The HTTP edge that receives GitHub's webhook deliveries."""
