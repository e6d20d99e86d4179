/* mome.h — the C API of mome's distributed shared memory.
 *
 * Programs run under `mome-run` get these functions from the preload library
 * (libmome_preload.so). Link with -lmome (libmome.so, built next to the
 * preload) so that the same binary also runs without mome, as one process:
 * libmome.so provides single-process versions (mome_nranks() == 1, barriers
 * and locks return at once, MomeMMap maps private memory). Under mome-run the
 * preload library's definitions take precedence over libmome.so's.
 *
 * Every function returns 0 on success and an errno value on failure, except
 * MomeMMap (MAP_FAILED and errno, like mmap) and the rank queries.
 *
 * Process-shared pthread mutexes and barriers placed in shared memory (a
 * segment in the DSM window) synchronize ranks on one node and across nodes,
 * where mome maps them to its distributed locks and barriers. Across nodes:
 * timedlock polls; a robust mutex never reports EOWNERDEAD; a rank's threads
 * wait for such locks and barriers one at a time, so a barrier cannot count
 * several threads of one rank. Condition variables, rwlocks and semaphores
 * in shared memory work on one node only.
 *
 * Fortran 77 bindings (by reference, trailing underscore, INTEGER = 4 bytes):
 *   INTEGER FUNCTION MOMEMMAP(ADDR, LEN, PROT, FLAGS, SEG, OFFSET)
 *        maps segment SEG (bytes OFFSET .. OFFSET+LEN) at the address of ADDR
 *        (e.g. a COMMON block), which must be page-aligned; MAP_FIXED is
 *        implied. Returns 0 or an errno value.
 *   CALL MOME_BARRIER()
 *   CALL MOME_LOCK(ID)       CALL MOME_UNLOCK(ID)
 *   INTEGER FUNCTION MOME_RANK()      INTEGER FUNCTION MOME_NRANKS()
 *   INTEGER FUNCTION MOMECONSISTENCY(ADDR, LEN, MODEL)
 *   INTEGER FUNCTION MOMESYNCMEM(ADDR, LEN, DATE)   (DATE is INTEGER*8)
 */
#ifndef MOME_H
#define MOME_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Consistency models (MomeConsistency). */
#define MOME_STRONG  0  /* sequential consistency, single writer (default) */
#define MOME_RELEASE 1  /* writes visible at release points (unlock, barrier) */
#define MOME_WEAK    2  /* visible after MomeSyncMem with a later date */

/* Map `len` bytes of shared segment `seg` (any non-negative integer chosen by
 * the program: every rank naming the same `seg` shares the same memory),
 * starting at byte `offset` of the segment.
 * - addr == NULL, or flags without MAP_FIXED: the segment's own address in the
 *   DSM window is returned, identical in every rank.
 * - MAP_FIXED: the segment is mapped at `addr` (page-aligned), e.g. over a
 *   COMMON block or a global array, which then is shared by all ranks.
 * The segment grows to offset + len bytes (up to window.segment_reserve). */
void *MomeMMap(void *addr, size_t len, int prot, int flags, int seg, off_t offset);

/* Select the consistency model of a range on the calling node. */
int MomeConsistency(void *addr, size_t len, int model);

/* Make [addr, addr+len) reflect every write made before `date` (a date
 * returned by mome_last_barrier_date()), under the weak model. */
int MomeSyncMem(void *addr, size_t len, uint64_t date);

/* Wait until every rank of the job has called mome_barrier(). */
int mome_barrier(void);
/* Date (count) of the last barrier this rank passed. */
uint64_t mome_last_barrier_date(void);

/* Job-wide locks, named by any 64-bit id. */
int mome_lock(uint64_t id);
int mome_unlock(uint64_t id);

/* This process's rank (0..nranks-1), the number of ranks, and its node. */
int mome_rank(void);
int mome_nranks(void);
int mome_node(void);

/* 1 when running under mome-run (connected to an agent), 0 otherwise. */
int mome_active(void);

/* Shared malloc (MomeMalloc). Blocks come from heaps shared by every rank of
 * every node, at the same address everywhere: a structure built with them
 * can be linked by pointers, passed through shared memory, read and changed
 * by any rank (coherent across nodes, like every shared segment), and any
 * rank may free or reallocate a block, whichever node allocated it.
 * Each node allocates from 8 MiB heaps of its own with no job-wide lock; a
 * block of another node is sent back to it (one round trip to the local
 * agent) and reused there. Plain free() and realloc() accept these blocks
 * too; with `memory: malloc: shared` in the job's configuration, malloc()
 * and friends allocate here as well. mome_shfree of a pointer that is not
 * a block prints an error on stderr and does nothing (a block freed twice
 * is caught unless its memory was reused meanwhile).
 * Without mome (libmome.so) these are malloc, calloc, realloc and free. */
void *mome_shmalloc(size_t size);
void *mome_shcalloc(size_t n, size_t size);
void *mome_shrealloc(void *p, size_t size);
void mome_shfree(void *p);
/* Bytes of shared heap this node's allocator has taken so far (it never
 * gives them back, but reuses what is freed); 0 without mome. */
size_t mome_shmalloc_footprint(void);

#ifdef __cplusplus
}
#endif
#endif /* MOME_H */
