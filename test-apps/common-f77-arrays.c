/* common-f77-arrays.c — storage of COMMON /ARRAYS/ for common-f77.f.
 *
 * common-f77 shares its COMMON block with MOMEMMAP(TAB, ..., MAP_FIXED),
 * which (like mmap with MAP_FIXED) maps whole pages at a page-aligned
 * address. Fortran 77 cannot ask for either: gfortran emits the block as a
 * common symbol aligned to a few bytes. So the block's storage is defined
 * here, where C can align it: gfortran names COMMON /ARRAYS/ `arrays_`, the
 * linker resolves the Fortran common symbol to this definition (a real
 * definition, since gcc defaults to -fno-common), and the block starts on a
 * page and spans whole pages (NMAX doubles, NMAX a multiple of 512), so
 * mapping it maps nothing else of the program's data.
 */
#include "apputil.h"

#define NMAX 262144 /* must equal NMAX in common-f77.f */
_Static_assert(NMAX % 512 == 0, "COMMON /ARRAYS/ must be whole 4096-byte pages");

struct {
    double tab[NMAX];
} arrays_ __attribute__((aligned(4096)));

/* CALL F77PERR(IERR): prints the text of errno value IERR (Fortran 77 has
 * no strerror). */
void f77perr_(const int *err)
{
    fprintf(stderr, "common-f77: MOMEMMAP: %s\n", strerror(*err));
}

/* CALL F77ERR(WHAT, IERR): the same for MOMECONSISTENCY (WHAT = 1) or
 * MOMESYNCMEM (WHAT = 2). */
void f77err_(const int *what, const int *err)
{
    fprintf(stderr, "common-f77: %s: %s\n", *what == 1 ? "MOMECONSISTENCY" : "MOMESYNCMEM",
            strerror(*err));
}

/* INTEGER FUNCTION F77MODEL(): the model MOME_APP_MODEL names (0 strong,
 * 1 release, 2 weak), or -1 when it is unset; a bad value exits 2. */
int f77model_(void)
{
    app_name = "common-f77";
    return app_model();
}

/* INTEGER*8 FUNCTION F77DATE(): mome_last_barrier_date(), which has no
 * Fortran binding. */
int64_t f77date_(void)
{
    return (int64_t)mome_last_barrier_date();
}
