// placeholder: this op family's implementation lands here.
