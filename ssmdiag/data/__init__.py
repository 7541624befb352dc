"""Input data: haystacks, needles, MQAR."""
