"""The EXL3 converter: calibration, Hessians, LDLQ, the Viterbi trellis search, bit allocation, writer."""
