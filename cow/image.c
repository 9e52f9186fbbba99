/* SPDX-License-Identifier: BSD-3-Clause */
/* Safe opening of image files and QEMU-compatible image locks (see
 * image.h for the convention). */
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "error.h"
#include "image.h"
#include "io.h"
#include "layer.h"

#define LOCK_PERM_BASE   100    /* + bit: permission held */
#define LOCK_SHARED_BASE 200    /* + bit: permission not shared */

static const char *const perm_names[IMAGE_PERM_COUNT] = {
  "consistent read", "write", "write unchanged", "resize",
};

static const char *
file_kind (mode_t m)
{
  if (S_ISFIFO (m))
    return "a FIFO";
  if (S_ISSOCK (m))
    return "a socket";
  if (S_ISCHR (m))
    return "a character device";
  if (S_ISDIR (m))
    return "a directory";
  if (S_ISLNK (m))
    return "a symbolic link";
  return "not a regular file";
}

int
image_open (const char *path, int flags, unsigned how)
{
  struct stat st;
  int fd, fl, saved;

  /* O_NONBLOCK: opening a FIFO must not wait for a writer; it is
   * refused below and cleared for a real image. */
  fd = io_open (path, flags | O_NONBLOCK
                | ((how & IMAGE_NOFOLLOW) ? O_NOFOLLOW : 0), 0);
  if (fd == -1) {
    if (errno == ELOOP && (how & IMAGE_NOFOLLOW))
      cow_error_set (ELOOP, "%s: is a symbolic link; cowchain does not open "
                     "a state directory's files through one", path);
    else
      cow_error_errno ("%s: cannot open", path);
    return -1;
  }
  if (fstat (fd, &st) == -1) {
    cow_error_errno ("%s: stat", path);
    goto err;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    cow_error_set (EINVAL, "%s: is %s; an image must be a regular file or a "
                   "block device", path, file_kind (st.st_mode));
    goto err;
  }
  fl = fcntl (fd, F_GETFL);
  if (fl == -1 || fcntl (fd, F_SETFL, fl & ~O_NONBLOCK) == -1) {
    cow_error_errno ("%s: fcntl", path);
    goto err;
  }
  return fd;

 err:
  saved = errno;
  io_close (fd);
  errno = saved;
  return -1;
}

struct image_lock {
  int fd;                       /* a descriptor of its own: holds the bytes */
  char *path;
  enum image_access access;
};

static unsigned
perms_held (enum image_access a)
{
  return a == IMAGE_WRITER
    ? IMAGE_PERM_CONSISTENT_READ | IMAGE_PERM_WRITE | IMAGE_PERM_RESIZE
    : IMAGE_PERM_CONSISTENT_READ;
}

static unsigned
perms_unshared (enum image_access a)
{
  return a == IMAGE_FORCE_SHARE ? 0 : IMAGE_PERM_WRITE | IMAGE_PERM_RESIZE;
}

static int
set_byte (int fd, short type, off_t off)
{
  struct flock fl = {
    .l_type = type, .l_whence = SEEK_SET, .l_start = off, .l_len = 1,
  };

  return fcntl (fd, F_OFD_SETLK, &fl);
}

/* Does another open file description hold a lock on byte off?  1 yes,
 * 0 no, -1 error. */
static int
byte_taken (int fd, off_t off)
{
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = off, .l_len = 1,
  };

  if (fcntl (fd, F_OFD_GETLK, &fl) == -1)
    return -1;
  return fl.l_type != F_UNLCK;
}

/* Lock exactly the bytes of access a (unlocking the others). */
static int
apply_bytes (struct image_lock *lk, enum image_access a)
{
  unsigned held = perms_held (a), unshared = perms_unshared (a);

  for (int i = 0; i < IMAGE_PERM_COUNT; i++) {
    unsigned bit = 1u << i;
    if (set_byte (lk->fd, (held & bit) ? F_RDLCK : F_UNLCK,
                  LOCK_PERM_BASE + i) == -1
        || set_byte (lk->fd, (unshared & bit) ? F_RDLCK : F_UNLCK,
                     LOCK_SHARED_BASE + i) == -1) {
      cow_error_errno ("%s: cannot lock the image", lk->path);
      return -1;
    }
  }
  return 0;
}

static void open_by (dev_t dev, ino_t ino, char *buf, size_t len);

/* Is anybody else in the way of access a?  Others must share every
 * permission held, and hold none that is not shared. */
static int
check_bytes (struct image_lock *lk, enum image_access a)
{
  unsigned held = perms_held (a), unshared = perms_unshared (a);

  for (int i = 0; i < IMAGE_PERM_COUNT; i++) {
    unsigned bit = 1u << i;
    int not_shared = (held & bit)
      ? byte_taken (lk->fd, LOCK_SHARED_BASE + i) : 0;
    int held_by_other = (unshared & bit)
      ? byte_taken (lk->fd, LOCK_PERM_BASE + i) : 0;

    if (not_shared == -1 || held_by_other == -1) {
      cow_error_errno ("%s: cannot test the image's locks", lk->path);
      return -1;
    }
    if (not_shared || held_by_other) {
      struct stat st;
      char who[256] = "";
      if (fstat (lk->fd, &st) == 0)
        open_by (st.st_dev, st.st_ino, who, sizeof who);
      if (not_shared)
        cow_error_set (EBUSY, "%s: locked by another process%s, which does "
                       "not share the \"%s\" permission that cowchain needs "
                       "(QEMU's image locks); is a server, QEMU or "
                       "qemu-img using it?", lk->path, who, perm_names[i]);
      else
        cow_error_set (EBUSY, "%s: locked by another process%s, which holds "
                       "the \"%s\" permission that cowchain does not share "
                       "(QEMU's image locks); is a server, QEMU or qemu-io "
                       "using it?", lk->path, who, perm_names[i]);
      return -1;
    }
  }
  return 0;
}

struct image_lock *
image_lock_take (const char *path, int fd, enum image_access a)
{
  struct image_lock *lk = calloc (1, sizeof *lk);
  struct stat a_st, b_st;

  if (lk == NULL || (lk->path = strdup (path)) == NULL) {
    cow_error_errno ("calloc");
    free (lk);
    return NULL;
  }
  lk->fd = open (path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (lk->fd == -1) {
    cow_error_errno ("%s: cannot open for locking", path);
    goto err;
  }
  /* The name must still lead to the file that fd has open. */
  if (fstat (fd, &a_st) == -1 || fstat (lk->fd, &b_st) == -1) {
    cow_error_errno ("%s: stat", path);
    goto err;
  }
  if (a_st.st_dev != b_st.st_dev || a_st.st_ino != b_st.st_ino) {
    cow_error_set (EBUSY, "%s: the file was replaced while it was opened",
                   path);
    goto err;
  }
  if (apply_bytes (lk, a) == -1 || check_bytes (lk, a) == -1)
    goto err;
  lk->access = a;
  return lk;

 err:
  if (lk->fd != -1)
    close (lk->fd);             /* gives back any byte taken */
  free (lk->path);
  free (lk);
  return NULL;
}

int
image_lock_change (struct image_lock *lk, enum image_access a)
{
  if (lk->access == a)
    return 0;
  if (apply_bytes (lk, a) == -1 || check_bytes (lk, a) == -1) {
    /* Back to what was held (lk->access is unchanged). */
    apply_bytes (lk, lk->access);
    return -1;
  }
  lk->access = a;
  return 0;
}

enum image_access
layer_lock_access (unsigned flags)
{
  if (!(flags & LAYER_RDONLY) || (flags & LAYER_HOLD_WRITE))
    return IMAGE_WRITER;
  return (flags & LAYER_FORCE_SHARE) ? IMAGE_FORCE_SHARE : IMAGE_READER;
}

void
image_lock_release (struct image_lock *lk)
{
  if (lk == NULL)
    return;
  close (lk->fd);
  free (lk->path);
  free (lk);
}

/* The command name of process pid into comm (empty if it is gone). */
static bool
proc_comm (long pid, char *comm, size_t len)
{
  char path[64];
  FILE *c;

  comm[0] = '\0';
  snprintf (path, sizeof path, "/proc/%ld/comm", pid);
  c = fopen (path, "re");
  if (c == NULL)
    return false;
  if (fgets (comm, (int) len, c))
    comm[strcspn (comm, "\n")] = '\0';
  fclose (c);
  return true;
}

/* Does process pid have (dev, ino) open? */
static bool
proc_has_open (long pid, dev_t dev, ino_t ino)
{
  char path[64];
  DIR *fds;
  struct dirent *e;
  bool found = false;

  snprintf (path, sizeof path, "/proc/%ld/fd", pid);
  fds = opendir (path);
  if (fds == NULL)
    return false;
  while (!found && (e = readdir (fds)) != NULL) {
    char link[300];
    struct stat st;
    if (e->d_name[0] == '.')
      continue;
    snprintf (link, sizeof link, "/proc/%ld/fd/%s", pid, e->d_name);
    found = stat (link, &st) == 0 && st.st_dev == dev && st.st_ino == ino;
  }
  closedir (fds);
  return found;
}

/* The other processes that have (dev, ino) open, as " (open in pid N,
 * COMM; ...)" in buf (at most three), or empty.  OFD locks carry no
 * owner, so this is the best way to name who holds an image. */
static void
open_by (dev_t dev, ino_t ino, char *buf, size_t len)
{
  DIR *proc = opendir ("/proc");
  struct dirent *e;
  long self = (long) getpid ();
  size_t off = 0;
  int found = 0;

  buf[0] = '\0';
  while (proc && found < 3 && (e = readdir (proc)) != NULL) {
    char *end, comm[64];
    long p = strtol (e->d_name, &end, 10);
    int w;
    if (*end || p <= 0 || p == self || !proc_has_open (p, dev, ino))
      continue;
    proc_comm (p, comm, sizeof comm);
    w = snprintf (buf + off, len - off, "%s pid %ld%s%s",
                  found ? ";" : " (open in", p, comm[0] ? ", " : "", comm);
    if (w < 0 || (size_t) w >= len - off - 1)
      break;
    off += (size_t) w;
    found++;
  }
  if (proc)
    closedir (proc);
  if (found)
    snprintf (buf + off, len - off, ")");
}

/* Who holds a flock on the file (dev, ino)?  Writes " (pid N, COMM)"
 * into buf, or leaves it empty.  /proc/locks names the process that took
 * the lock; a server that took it and then went into the background
 * (nbdkit forks) is gone, so then the processes that have the file open
 * are searched (those of other users only when run as root).  Returns
 * the pid, 0 if not known. */
static long
flock_holder (dev_t dev, ino_t ino, char *buf, size_t len)
{
  FILE *f = fopen ("/proc/locks", "re");
  char line[256], want[64], comm[64];
  long pid = 0;

  buf[0] = '\0';
  if (f == NULL)
    return 0;
  snprintf (want, sizeof want, "%02x:%02x:%" PRIuMAX " ", major (dev),
            minor (dev), (uintmax_t) ino);
  while (fgets (line, sizeof line, f)) {
    if (strstr (line, " FLOCK ") == NULL || strstr (line, "->")
        || strstr (line, want) == NULL)
      continue;
    if (sscanf (line, "%*d: FLOCK %*s %*s %ld", &pid) != 1 || pid <= 0)
      pid = 0;
    break;
  }
  fclose (f);
  if (pid > 0 && !proc_comm (pid, comm, sizeof comm)) {
    DIR *proc = opendir ("/proc");
    struct dirent *e;
    long self = (long) getpid ();

    pid = 0;
    while (proc && (e = readdir (proc)) != NULL) {
      char *end;
      long p = strtol (e->d_name, &end, 10);
      if (*end || p <= 0 || p == self || !proc_has_open (p, dev, ino))
        continue;
      if (proc_comm (p, comm, sizeof comm)) {
        pid = p;
        break;
      }
    }
    if (proc)
      closedir (proc);
  }
  if (pid > 0 && pid != (long) getpid ())
    snprintf (buf, len, " (pid %ld%s%s)", pid, comm[0] ? ", " : "", comm);
  return pid;
}

int
image_lock_dir (const char *dir, bool exclusive)
{
  int fd = open (dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  struct stat st;
  char who[128] = "";

  if (fd == -1) {
    cow_error_errno ("%s: cannot open the state directory", dir);
    return -1;
  }
  if (flock (fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0)
    return fd;
  if (errno != EWOULDBLOCK) {
    cow_error_errno ("%s: cannot lock the state directory", dir);
    close (fd);
    return -1;
  }
  if (fstat (fd, &st) == 0
      && flock_holder (st.st_dev, st.st_ino, who, sizeof who) == getpid ()) {
    cow_error_set (EBUSY, "%s: another disk of this server already uses this "
                   "state directory", dir);
    close (fd);
    return -1;
  }
  cow_error_set (EBUSY, "%s: the disk is in use by another process%s; "
                 "if that is a running server, use its control socket",
                 dir, who);
  close (fd);
  return -1;
}
