C     common-f77 -- the COMMON-block program of the seeds, in Fortran 77.
C
C     COMMON /ARRAYS/ TAB is made shared by every rank with
C         IERR = MOMEMMAP(TAB, LEN, 3, 16, 1, 0)
C     (PROT_READ|PROT_WRITE = 3, MAP_FIXED = 16, segment 1, offset 0):
C     from then on TAB is the same memory in every rank. MOMEMMAP needs a
C     page-aligned, whole-page block: common-f77-arrays.c gives /ARRAYS/
C     its storage, 4096-byte aligned (NMAX there must equal NMAX here).
C
C     Each of STEPS steps, every rank updates one slice of TAB(1..N),
C         TAB(I) = TAB(I) / 2 + MOD(7 I + 13 K, 101) / 101
C     the slice moving to the next rank every step (so each rank reads
C     what another rank wrote), then MOME_BARRIER; rank 0 adds TAB(1..N)
C     to a running total, then MOME_BARRIER again. At the end rank 0
C     redoes the computation in a private array and compares: prints
C         checksum common-f77 <total>
C     then OK, or MISMATCH and exit status 1.
C
C     Usage: common-f77 [N [STEPS]]  (N <= NMAX, default 65536; STEPS,
C     default 10).
C
C     MOME_APP_MODEL=strong|release|weak (see apputil.h) selects the
C     consistency model of TAB with MOMECONSISTENCY; under weak, APPBAR
C     (every barrier) then brings TAB up to date with MOMESYNCMEM at the
C     barrier's date.
C
      PROGRAM CMNF77
      IMPLICIT NONE
      INTEGER NMAX
      PARAMETER (NMAX = 262144)
      DOUBLE PRECISION TAB
      COMMON /ARRAYS/ TAB(NMAX)
      DOUBLE PRECISION SEQ(NMAX)
      SAVE SEQ
      INTEGER MOMEMMAP, MOME_RANK, MOME_NRANKS, MOMECONSISTENCY
      INTEGER F77MODEL, MODEL
      EXTERNAL MOMEMMAP, MOME_RANK, MOME_NRANKS, APPBAR, F77PERR
      EXTERNAL MOMECONSISTENCY, F77MODEL, F77ERR
      INTEGER IARGC
      INTEGER N, NSTEPS, IERR, ME, NP, LO, HI, I, J, K, LEN, NARGS
      INTEGER IOS, NBAD
      DOUBLE PRECISION S, TOTAL, TSEQ
      CHARACTER*64 ARG
      CHARACTER*32 BUF
C
      N = 65536
      NSTEPS = 10
      NBAD = 0
      NARGS = IARGC()
      DO 10 I = 1, NARGS
         CALL GETARG(I, ARG)
         IF (ARG .EQ. '-h' .OR. ARG .EQ. '--help') THEN
            CALL USAGE(6)
            CALL EXIT(0)
         END IF
   10 CONTINUE
      IF (NARGS .GT. 2) THEN
         WRITE (0, '(A)') 'common-f77: too many arguments'
         CALL USAGE(0)
         CALL EXIT(2)
      END IF
      IF (NARGS .GE. 1) THEN
         CALL GETARG(1, ARG)
         READ (ARG, '(I32)', IOSTAT=IOS) N
         IF (IOS .NE. 0 .OR. N .LT. 1 .OR. N .GT. NMAX) THEN
            WRITE (0, '(3A,I0,A)') 'common-f77: bad N ''',
     &           ARG(1:LEN_TRIM(ARG)), ''' (1..', NMAX, ')'
            CALL USAGE(0)
            CALL EXIT(2)
         END IF
      END IF
      IF (NARGS .GE. 2) THEN
         CALL GETARG(2, ARG)
         READ (ARG, '(I32)', IOSTAT=IOS) NSTEPS
         IF (IOS .NE. 0 .OR. NSTEPS .LT. 0) THEN
            WRITE (0, '(3A)') 'common-f77: bad STEPS ''',
     &           ARG(1:LEN_TRIM(ARG)), ''''
            CALL USAGE(0)
            CALL EXIT(2)
         END IF
      END IF
C
C     Share the whole common block (NMAX doubles: whole pages).
      LEN = 8 * NMAX
      IERR = MOMEMMAP(TAB, LEN, 3, 16, 1, 0)
      IF (IERR .NE. 0) THEN
         CALL F77PERR(IERR)
         CALL EXIT(1)
      END IF
C     The model named by MOME_APP_MODEL, or -1 (none selected).
      MODEL = F77MODEL()
      IF (MODEL .GE. 0) THEN
         IERR = MOMECONSISTENCY(TAB, LEN, MODEL)
         IF (IERR .NE. 0) THEN
            CALL F77ERR(1, IERR)
            CALL EXIT(1)
         END IF
      END IF
      ME = MOME_RANK()
      NP = MOME_NRANKS()
C     Every rank has mapped the segment before anyone writes to it.
      CALL APPBAR(TAB, LEN, MODEL)
C
      TOTAL = 0.0D0
      DO 40 K = 1, NSTEPS
         J = MOD(ME + K, NP)
         LO = 1 + (N / NP) * J + MIN(J, MOD(N, NP))
         HI = LO + N / NP - 1
         IF (J .LT. MOD(N, NP)) HI = HI + 1
         DO 20 I = LO, HI
            TAB(I) = TAB(I) * 0.5D0 + DBLE(MOD(7 * I + 13 * K, 101))
     &           / 101.0D0
   20    CONTINUE
         CALL APPBAR(TAB, LEN, MODEL)
         IF (ME .EQ. 0) THEN
            S = 0.0D0
            DO 30 I = 1, N
               S = S + TAB(I)
   30       CONTINUE
            TOTAL = TOTAL + S
         END IF
C        Rank 0 has read TAB before the next step rewrites it.
         CALL APPBAR(TAB, LEN, MODEL)
   40 CONTINUE
C
      IF (ME .EQ. 0) THEN
         DO 50 I = 1, N
            SEQ(I) = 0.0D0
   50    CONTINUE
         TSEQ = 0.0D0
         DO 80 K = 1, NSTEPS
            DO 60 I = 1, N
               SEQ(I) = SEQ(I) * 0.5D0 + DBLE(MOD(7 * I + 13 * K, 101))
     &              / 101.0D0
   60       CONTINUE
            S = 0.0D0
            DO 70 I = 1, N
               S = S + SEQ(I)
   70       CONTINUE
            TSEQ = TSEQ + S
   80    CONTINUE
         NBAD = 0
         DO 90 I = N, 1, -1
            IF (TAB(I) .NE. SEQ(I)) NBAD = I
   90    CONTINUE
         WRITE (BUF, '(ES17.10E2)') TOTAL
         WRITE (6, '(2A)') 'checksum common-f77 ', TRIM(ADJUSTL(BUF))
         IF (NBAD .NE. 0) THEN
            WRITE (6, '(A,I0,A,ES24.16,A,ES24.16)')
     &           'MISMATCH TAB(', NBAD, '): parallel', TAB(NBAD),
     &           ', sequential', SEQ(NBAD)
         ELSE IF (TOTAL .NE. TSEQ) THEN
            WRITE (6, '(A,ES24.16,A,ES24.16)')
     &           'MISMATCH total: parallel', TOTAL,
     &           ', sequential', TSEQ
            NBAD = -1
         ELSE
            WRITE (6, '(A)') 'OK'
         END IF
         FLUSH (6)
      END IF
C     Nobody leaves while rank 0 still reads TAB.
      CALL APPBAR(TAB, LEN, MODEL)
      IF (ME .EQ. 0 .AND. NBAD .NE. 0) CALL EXIT(1)
      END
C
      SUBROUTINE USAGE(IUNIT)
      IMPLICIT NONE
      INTEGER IUNIT
      WRITE (IUNIT, '(A)') 'usage: common-f77 [N [STEPS]]'
      WRITE (IUNIT, '(A)') '  F77 COMMON block shared with MOMEMMAP:'
      WRITE (IUNIT, '(A)') '  N doubles (default 65536, max 262144),'
      WRITE (IUNIT, '(A)') '  STEPS steps (default 10)'
      END
C
C     APPBAR: MOME_BARRIER, then, under the weak model (MODEL = 2), makes
C     TAB(1..LEN/8) reflect every write made before that barrier.
      SUBROUTINE APPBAR(TAB, LEN, MODEL)
      IMPLICIT NONE
      DOUBLE PRECISION TAB(*)
      INTEGER LEN, MODEL, IERR, MOMESYNCMEM
      INTEGER*8 F77DATE, DATE
      EXTERNAL MOME_BARRIER, MOMESYNCMEM, F77DATE, F77ERR
      CALL MOME_BARRIER()
      IF (MODEL .EQ. 2) THEN
         DATE = F77DATE()
         IERR = MOMESYNCMEM(TAB, LEN, DATE)
         IF (IERR .NE. 0) THEN
            CALL F77ERR(2, IERR)
            CALL EXIT(1)
         END IF
      END IF
      END
