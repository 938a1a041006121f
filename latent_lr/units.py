"""Units used throughout latent-lr, in one place.

Lengths are in Å, charges in elementary charges (e), energies in eV,
forces in eV/Å, stress in eV/Å³, dipoles in e·Å, electric fields in V/Å.
"""

#: Coulomb constant k_e = 1/(4 π ε0) in eV·Å/e² (CODATA 2018).
COULOMB_CONSTANT: float = 14.399645
