"""The teaching half of handprop: backprop-ninja exercises, their solutions, and the grader."""
